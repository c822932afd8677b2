from fednode.cli import main

main()
