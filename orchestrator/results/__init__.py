"""Results: what runs and searches left in storage, read (runs, show, compare, curves), published (leaderboard, MLflow) and exported."""
