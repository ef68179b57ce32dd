from sip.train.cli import main

main()
