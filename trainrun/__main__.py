from trainrun.commands.train import main

main()
