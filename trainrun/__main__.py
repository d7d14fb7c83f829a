from trainrun.start import main

main()
