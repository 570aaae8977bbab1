from drnn_cli.cli import main

main()
