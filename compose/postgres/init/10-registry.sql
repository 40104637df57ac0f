-- The schema registry's database (docker-compose.yml's `registry` makes its tables in it).
CREATE DATABASE biofeed_registry;
