from abft_lens.cli import main

main()
