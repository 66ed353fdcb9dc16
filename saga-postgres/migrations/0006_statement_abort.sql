-- Aborts a transition's statement that carries application writes (staged
-- writes) when the saga's own part does not apply: its instance write
-- matched no row (a stale revision: SQLSTATE SG001) or the message it
-- consumes was consumed before (SG002). Raising rolls the whole statement
-- back, the application's writes with it.
CREATE OR REPLACE FUNCTION saga_abort(code text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF code = 'conflict' THEN
        RAISE EXCEPTION 'saga transition aborted: stale revision' USING ERRCODE = 'SG001';
    END IF;
    RAISE EXCEPTION 'saga transition aborted: message consumed before' USING ERRCODE = 'SG002';
END
$$;
