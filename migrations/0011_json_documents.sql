-- Documents onkos writes whole and reads whole are stored as json, not jsonb.
--
-- jsonb re-encodes a document on the way in: every number is parsed into a numeric, every
-- object's keys sorted. For a feature analysis's result (about 5 kB of text, most of it numbers)
-- that parsing was the largest single cost of storing an analysis: about a third of the
-- database's CPU under `make bench` (BENCHMARKS.md). json validates the text and keeps it as it
-- came, which is also what provenance wants: a result is stored as the exact canonical text its
-- digest was taken over. Nothing queries inside these documents; ad-hoc queries can still use the
-- json operators or cast to jsonb.
alter table results
    alter column result type json using result::json,
    alter column timings type json using timings::json;
alter table analyses alter column input type json using input::json;
alter table provenance alter column record type json using record::json;

-- A result stays in its row, compressed (lz4), rather than being moved out to the TOAST table,
-- which cost a second heap insert and an index insert per result.
alter table results alter column result set compression lz4, alter column result set storage main;
alter table analyses alter column input set compression lz4;
