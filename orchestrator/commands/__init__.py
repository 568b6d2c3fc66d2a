"""avlab's subcommands, one module each: its argparse definition, the call into the library and
the printing of the outcome, nothing else. ``orchestrator.cli`` builds the parser from them
(``COMMANDS``); nothing else imports them."""
