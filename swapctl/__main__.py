from swapctl.cli import main

main()
