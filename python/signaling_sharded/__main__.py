from signaling_sharded.server.cli import main

main()
