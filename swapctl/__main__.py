from swapctl.cli import run

run()
