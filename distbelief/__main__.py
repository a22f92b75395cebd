from distbelief.cli import main

main()
