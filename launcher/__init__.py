"""`ps-launch`: a server, K workers and an evaluator as local processes."""
