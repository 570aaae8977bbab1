from drnn_cli.cli import program

program()
