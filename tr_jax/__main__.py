from tr_jax.cli import main

main()
