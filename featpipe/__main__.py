from featpipe.cli import main

main()
