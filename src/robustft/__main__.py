from robustft.cli import main

main()
