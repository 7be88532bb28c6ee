from visionserve.cli import main

main()
