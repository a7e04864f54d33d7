from hcd.cli import main

main()
