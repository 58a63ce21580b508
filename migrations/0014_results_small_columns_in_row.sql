-- A result row is about 3 kB after lz4, over the 2 kB at which PostgreSQL starts moving a row's
-- columns out of line. Migration 0011 kept the result itself in the row (storage main), but the
-- toaster then moved the next largest column that may go out of line, the timings (under 100 B),
-- to the TOAST table: every stored result cost a second heap insert and a TOAST index insert for
-- a hundred bytes, and every read a TOAST lookup. The small columns stay in the row.
alter table results
    alter column timings set storage main,
    alter column execution_provider set storage main,
    alter column tenant_id set storage main;
