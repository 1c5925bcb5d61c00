from ddpmcli.cli.app import main

main()
