-- docker-entrypoint-initdb.d step 3, after 10-bank.sql (proxy/data/bank.sql) created the tables:
-- the demo logins may read and write the bank tables; pgveil decides what they actually see.
GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;
