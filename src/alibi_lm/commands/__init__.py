"""One module per `alibi-lm` subcommand; see `alibi_lm.cli` for the contract."""
