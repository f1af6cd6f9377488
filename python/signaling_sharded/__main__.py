from signaling_sharded.cli import main

main()
