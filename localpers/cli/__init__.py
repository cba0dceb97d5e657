"""The command line: one thin module per group of subcommands over the library (cli is the dispatcher).

May import: every other layer. User mistakes raise localpers.errors.UserError and print as one line.
"""
