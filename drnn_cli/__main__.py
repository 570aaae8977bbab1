from drnn_cli.launch import program

program()
