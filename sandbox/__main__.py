from sandbox.cli import cli_main

cli_main()
