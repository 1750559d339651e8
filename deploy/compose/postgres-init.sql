-- Runs once, on an empty data directory: wallet's database is POSTGRES_DB; billing has its own.
CREATE DATABASE billing;
