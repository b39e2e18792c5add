from pipeline.fake_claude.cli import main

main()
