-- relay's event plumbing: the functions, as plain SQL a DBA can read and
-- re-apply with psql on a migrated database (every statement is idempotent):
--
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/relay.sql
--
-- (relay applies it itself after its alembic migrations, on every migrate.)
-- Everything lives in the schema "relay"; application tables are only touched
-- by relay.watch(), which adds three statement-level triggers, and by
-- relay.unwatch(), which removes them again.
--
-- How a change travels
-- --------------------
-- 1. A statement on a watched table fires a statement-level trigger that sees
--    every changed row at once through its transition tables, and appends one
--    row per change to relay.events in the same transaction. A rolled-back
--    change leaves nothing; a committed one always leaves its event, whatever
--    its size (the row travels in the table, never in a NOTIFY payload).
-- 2. Wake-ups. A NOTIFY makes PostgreSQL serialize every notifying commit,
--    disk flush included, behind one cluster-wide lock, which halves the
--    write rate of small transactions. So writers notify only while some
--    relay listener is asleep (relay.listeners.sleeping). A busy listener
--    waits in relay.poll_wait() instead, which looks for a commit every
--    millisecond inside the server. Going to sleep is a
--    handshake without locks: the listener sets sleeping = true, then keeps
--    polling until every transaction that was running at that moment has
--    ended (pg_xact_status of its snapshot's in-progress xids; for at most a
--    second), then polls once more and only then waits for a NOTIFY. A writer
--    that read sleeping = false was running before the flag flipped, so the
--    final poll sees its events; a writer that read true sends the NOTIFY.
--    The listener also polls once a second while asleep, so a writer still
--    running when the handshake gave up, or a lost wake-up, costs latency,
--    never an event: the log is the truth.
-- 3. The relay calls relay.tick(), which records a snapshot. The events of
--    tick N are those whose transaction is visible in tick N's snapshot and
--    was not visible in tick N-1's. That orders events by the moment their
--    transaction became visible (commit order), not by sequence number: a
--    transaction that took its sequence numbers early but committed late
--    lands in a later tick. This is the PgQ design; writers never wait on a
--    lock of ours.
-- 4. Within a tick, events are ordered by seq. Two transactions that touch
--    the same row are ordered correctly by seq too: the second one waited for
--    the first one's row lock, so it wrote its events after the first committed.
--
-- An event's position is (tick, seq); clients see it as the string "tick-seq".

-- The tables (relay.watched, relay.events, relay.listeners, relay.ticks, and
-- the apps and plans) are created and changed only by relay's numbered
-- migrations (migrations/), each frozen once released; `relay migrate` runs
-- them and then applies this file, so every function below is in force at
-- its newest version after every upgrade, in the migrations' transaction.
-- relay/schema.py describes the tables as the migrations leave them (a test
-- compares the two). To review the SQL before it runs, read
-- migrations/versions/ and migrations/sql/ (they run raw SQL, so alembic's
-- offline --sql mode is refused rather than printing part of it).

-- Whether a transaction that wrote events became visible between two
-- snapshots (the test relay.tick() and relay.poll_wait() make).
CREATE OR REPLACE FUNCTION relay.events_since(last_snap pg_snapshot, snap pg_snapshot)
RETURNS boolean
LANGUAGE sql STABLE
-- Never by scanning the log: on a fast-growing log the statistics lag behind,
-- and a sequential scan "that stops at the first match" reads it all. With
-- sequential scans off, the plan is a range scan of events_xid whatever the
-- values, so PostgreSQL may keep a generic plan (planning each call, as these
-- functions once did, cost more than the query: 0.1-0.5 ms per listener poll).
SET enable_seqscan = off
AS $$
    SELECT EXISTS (
        SELECT 1 FROM relay.events e
        WHERE e.xid >= pg_snapshot_xmin(last_snap)
          AND pg_visible_in_snapshot(e.xid, snap)
          AND NOT pg_visible_in_snapshot(e.xid, last_snap)
    )
$$;

-- Record a new tick if anything was committed since the last one; return the
-- newest tick id either way. Ticks are serialized by an advisory lock so that
-- each snapshot contains the one before it, whichever relay process ticks.
--
-- The listener commits its ticks asynchronously (they are then off the disk
-- flush's latency path), so a crash can lose the newest ticks, and the id
-- sequence can fall back below their ids. relay.tick_guard, an unlogged
-- table, is emptied by crash recovery: the first tick after a crash finds it
-- empty, moves the sequence a billion ids on (more than could ever be lost
-- between two WAL flushes), and commits synchronously. No id is ever used by
-- two ticks, and a position in a lost tick names no tick (dbjoin and
-- relay.poll() answer it with "reload").
CREATE OR REPLACE FUNCTION relay.tick() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
AS $$
DECLARE
    last_id   bigint;
    last_snap pg_snapshot;
    snap      pg_snapshot;
    new_id    bigint;
    ids       regclass;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('relay.tick'));
    SELECT id, snapshot INTO last_id, last_snap FROM relay.ticks ORDER BY id DESC LIMIT 1;
    IF NOT EXISTS (SELECT 1 FROM relay.tick_guard) THEN
        ids := pg_get_serial_sequence('relay.ticks', 'id')::regclass;
        PERFORM setval(ids, greatest(coalesce(last_id, 0),
                                     coalesce(pg_sequence_last_value(ids), 0)) + 1000000000);
        INSERT INTO relay.tick_guard DEFAULT VALUES ON CONFLICT DO NOTHING;
        -- Until the end of this transaction (the SET clauses above do not undo it).
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    -- A statement after the lock: a VOLATILE function takes a fresh snapshot
    -- per statement, so this one sees every tick committed before ours.
    snap := pg_current_snapshot();
    IF last_id IS NOT NULL AND NOT relay.events_since(last_snap, snap) THEN
        RETURN last_id;
    END IF;
    INSERT INTO relay.ticks (snapshot) VALUES (snap) RETURNING id INTO new_id;
    RETURN new_id;
END;
$$;

-- The events of ticks after_tick+1 .. upto_tick, in order, with their tick.
CREATE OR REPLACE FUNCTION relay.events_between(after_tick bigint, upto_tick bigint)
RETURNS TABLE (
    tick bigint, seq bigint, app text, repo text, op text, row_id text,
    owner_id text, account_id text, old_owner_id text, old_account_id text, data text,
    xid bigint
)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT t.id, e.seq, e.app, e.repo, e.op::text, e.row_id::text,
           e.owner_id, e.account_id, e.old_owner_id, e.old_account_id, e.data::text,
           e.xid::text::bigint
    FROM (
        SELECT id, snapshot, lag(snapshot) OVER (ORDER BY id) AS prev
        FROM relay.ticks
        -- Start at the newest tick at or before after_tick, not at after_tick
        -- itself: tick ids can have gaps (a rolled-back tick, a crash), and
        -- each tick needs its real predecessor as its lower edge.
        WHERE id >= coalesce((SELECT max(id) FROM relay.ticks WHERE id <= after_tick), 0)
          AND id <= upto_tick
    ) t
    JOIN relay.events e
      ON e.xid >= pg_snapshot_xmin(t.prev)
     AND e.xid < pg_snapshot_xmax(t.snapshot)
     AND pg_visible_in_snapshot(e.xid, t.snapshot)
     AND NOT pg_visible_in_snapshot(e.xid, t.prev)
    WHERE t.id > after_tick AND t.prev IS NOT NULL
    ORDER BY t.id, e.seq
$$;

-- One page of a replay: the events of app only_app's repository only_repo after position
-- (after_tick, after_seq) up to tick upto_tick, in order, at most max_rows.
-- after_seq NULL means after the whole of after_tick. A replay calls this
-- page after page, each time from the last event it got, and holds no
-- transaction in between. A page that would start in ticks pruned meanwhile
-- raises instead of silently skipping them.
CREATE OR REPLACE FUNCTION relay.events_page(
    after_tick bigint, after_seq bigint, upto_tick bigint, max_rows integer,
    only_app text, only_repo text
)
RETURNS TABLE (
    tick bigint, seq bigint, app text, repo text, op text, row_id text,
    owner_id text, account_id text, old_owner_id text, old_account_id text, data text
)
LANGUAGE plpgsql STABLE
-- One plan per tick query would cost more than the query: the inner query is
-- a range scan on events_xid whatever the values, so its generic plan is kept.
SET enable_seqscan = off
AS $$
DECLARE
    t record;
    wanted integer := max_rows;
    got integer;
BEGIN
    -- The tick holding after_seq (or the one just before the first wanted
    -- tick) must still be there as the lower edge of what follows.
    IF NOT EXISTS (
        SELECT 1 FROM relay.ticks k
        WHERE k.id <= after_tick - CASE WHEN after_seq IS NULL THEN 0 ELSE 1 END
    ) THEN
        RAISE EXCEPTION 'relay: position %-% is older than the event log keeps',
            after_tick, after_seq USING ERRCODE = 'RL001';
    END IF;
    FOR t IN
        SELECT w.id, w.snapshot, w.prev FROM (
            SELECT k.id, k.snapshot, lag(k.snapshot) OVER (ORDER BY k.id) AS prev
            FROM relay.ticks k
            WHERE k.id >= coalesce((SELECT max(k2.id) FROM relay.ticks k2
                                    WHERE k2.id < after_tick), 0)
              AND k.id <= upto_tick
        ) w
        WHERE w.prev IS NOT NULL
          AND (w.id > after_tick OR (w.id = after_tick AND after_seq IS NOT NULL))
        ORDER BY w.id
    LOOP
        RETURN QUERY
            SELECT t.id, e.seq, e.app, e.repo, e.op::text, e.row_id::text,
                   e.owner_id, e.account_id, e.old_owner_id, e.old_account_id, e.data::text
            FROM relay.events e
            WHERE e.xid >= pg_snapshot_xmin(t.prev)
              AND e.xid < pg_snapshot_xmax(t.snapshot)
              AND pg_visible_in_snapshot(e.xid, t.snapshot)
              AND NOT pg_visible_in_snapshot(e.xid, t.prev)
              AND e.repo = only_repo AND e.app = only_app
              AND (t.id > after_tick OR e.seq > after_seq)
            ORDER BY e.seq
            LIMIT wanted;
        GET DIAGNOSTICS got = ROW_COUNT;
        wanted := wanted - got;
        EXIT WHEN wanted <= 0;
    END LOOP;
END;
$$;

-- One listener round trip: tick, then the events of the new ticks (at most
-- max_rows of them; the caller streams the rest with events_between). Every
-- row carries the newest tick in "upto"; with no new events a single row with
-- only "upto" set is returned.
CREATE OR REPLACE FUNCTION relay.poll(after_tick bigint, max_rows integer)
RETURNS TABLE (
    upto bigint, pruned boolean,
    tick bigint, seq bigint, app text, repo text, op text, row_id text,
    owner_id text, account_id text, old_owner_id text, old_account_id text, data text,
    xid bigint
)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
AS $$
DECLARE
    newest bigint := relay.tick();
    -- The caller's tick was pruned, or lost in a crash: the events after it
    -- are partly gone (or were cut differently), and the caller must say so
    -- instead of carrying on from another tick.
    lost boolean := NOT EXISTS (SELECT 1 FROM relay.ticks k WHERE k.id = after_tick);
BEGIN
    IF newest > after_tick AND NOT lost THEN
        RETURN QUERY
            SELECT newest, false, ev.* FROM relay.events_between(after_tick, newest) ev
            LIMIT max_rows;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT newest, lost, NULL::bigint, NULL::bigint, NULL::text, NULL::text,
                        NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                        NULL::text, NULL::bigint;
END;
$$;

-- relay.poll(), once something new is there: the listener's call while
-- events flow. It waits in the server, at most wait_ms, checking every
-- check_ms whether a transaction ended (the current snapshot changed) and,
-- only then, whether it wrote events or another relay ticked. So a commit is
-- seen within a check of its happening, at the cost of a few microseconds of
-- server CPU per check and one round trip per batch, instead of a round trip
-- every few milliseconds. It holds no lock and no xid while it waits.
-- waited_ms says how long it waited: what it returns was committed after
-- waited_ms - check_ms (the metrics' commit-to-dispatch latency).
CREATE OR REPLACE FUNCTION relay.poll_wait(
    after_tick bigint, max_rows integer, wait_ms integer, check_ms integer
)
RETURNS TABLE (
    waited_ms double precision, upto bigint, pruned boolean,
    tick bigint, seq bigint, app text, repo text, op text, row_id text,
    owner_id text, account_id text, old_owner_id text, old_account_id text, data text,
    xid bigint
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    started   timestamptz := clock_timestamp();
    deadline  timestamptz := started + make_interval(secs => wait_ms / 1000.0);
    seen      text := '';
    snap      pg_snapshot;
    last_id   bigint;
    last_snap pg_snapshot;
    waited    float8;
BEGIN
    LOOP
        snap := pg_current_snapshot();
        IF snap::text <> seen THEN
            seen := snap::text;
            SELECT k.id, k.snapshot INTO last_id, last_snap
            FROM relay.ticks k ORDER BY k.id DESC LIMIT 1;
            EXIT WHEN last_id IS DISTINCT FROM after_tick
                   OR relay.events_since(last_snap, snap);
        END IF;
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(check_ms / 1000.0);
    END LOOP;
    waited := extract(epoch FROM clock_timestamp() - started)::float8 * 1000;
    RETURN QUERY SELECT waited, p.* FROM relay.poll(after_tick, max_rows) p;
END;
$$;

-- Drop the log outside the retention window: events older than "keep", and
-- beyond the newest "max_rows" events (NULL: no size cap). Positions in ticks
-- older than the oldest kept tick can no longer be resumed from; clients get
-- a "reload" error instead of silently missing events. Only a DELETE of rows
-- no writer can still touch, so writers never wait; concurrent prunes (from
-- several relay processes) skip instead of queueing.
CREATE OR REPLACE FUNCTION relay.prune(keep interval, max_rows bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    boundary_id   bigint;
    by_size_id    bigint;
    boundary_snap pg_snapshot;
    oldest_kept   xid8;
    removed       bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('relay.prune')) THEN
        RETURN 0;
    END IF;
    SELECT max(id) INTO boundary_id FROM relay.ticks WHERE created_at <= now() - keep;
    IF max_rows IS NOT NULL THEN
        SELECT min(e.xid) INTO oldest_kept FROM relay.events e
        WHERE e.seq > (SELECT max(seq) FROM relay.events) - max_rows;
        IF oldest_kept IS NOT NULL THEN
            SELECT max(id) INTO by_size_id FROM relay.ticks
            WHERE pg_snapshot_xmin(snapshot) <= oldest_kept;
            boundary_id := greatest(boundary_id, by_size_id);
        END IF;
    END IF;
    IF boundary_id IS NULL THEN
        RETURN 0;
    END IF;
    SELECT snapshot INTO boundary_snap FROM relay.ticks WHERE id = boundary_id;
    -- Every event older than the boundary snapshot's xmin belongs to a tick
    -- at or before the boundary; the boundary tick itself stays as the lower
    -- edge of the next one.
    DELETE FROM relay.events WHERE xid < pg_snapshot_xmin(boundary_snap);
    GET DIAGNOSTICS removed = ROW_COUNT;
    DELETE FROM relay.ticks WHERE id < boundary_id;
    RETURN removed;
END;
$$;

-- Write (or rewrite) the capture function of one watched table from its
-- relay.watched row. It runs as its owner, the relay's role (SECURITY
-- DEFINER, with a fixed search_path), so writers need no privilege on the
-- relay schema and none can append an event of their own: relay.events is
-- written by capture functions only. Column names are quoted with %I.
CREATE OR REPLACE FUNCTION relay.write_capture(tbl regclass) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    w relay.watched%ROWTYPE;
    new_owner text;
    new_account text;
    old_owner text;
    old_account text;
BEGIN
    SELECT * INTO w FROM relay.watched WHERE table_oid = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched', tbl;
    END IF;
    new_owner := CASE WHEN w.owner_column IS NULL THEN 'NULL::text'
                      ELSE format('n.%I::text', w.owner_column) END;
    new_account := CASE WHEN w.account_column IS NULL THEN 'NULL::text'
                        ELSE format('n.%I::text', w.account_column) END;
    old_owner := CASE WHEN w.owner_column IS NULL THEN 'NULL::text'
                      ELSE format('o.%I::text', w.owner_column) END;
    old_account := CASE WHEN w.account_column IS NULL THEN 'NULL::text'
                        ELSE format('o.%I::text', w.account_column) END;
    -- One generated function per table, with the column names written in,
    -- so PostgreSQL plans each statement once and keeps the plan. Whole rows
    -- are n.* / o.*: a bare n would mean a column of that name, if the table has one.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION relay.%1$I() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO relay.events (xid, app, repo, op, row_id, owner_id, account_id, data)
                SELECT pg_current_xact_id(), %8$L, %2$L, 'c', to_json(n.%3$I), %4$s, %5$s,
                       row_to_json(n.*)
                FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO relay.events (xid, app, repo, op, row_id, owner_id, account_id,
                                          old_owner_id, old_account_id, data)
                SELECT pg_current_xact_id(), %8$L, %2$L,
                       CASE WHEN o.%3$I IS NULL THEN 'c' WHEN n.%3$I IS NULL THEN 'd' ELSE 'u' END,
                       to_json(coalesce(n.%3$I, o.%3$I)),
                       CASE WHEN n.%3$I IS NULL THEN %6$s ELSE %4$s END,
                       CASE WHEN n.%3$I IS NULL THEN %7$s ELSE %5$s END,
                       %6$s, %7$s,
                       CASE WHEN n.%3$I IS NULL THEN NULL ELSE row_to_json(n.*) END
                FROM old_rows o FULL JOIN new_rows n ON o.%3$I = n.%3$I;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO relay.events (xid, app, repo, op, row_id, owner_id, account_id)
                SELECT pg_current_xact_id(), %8$L, %2$L, 'd', to_json(o.%3$I), %6$s, %7$s
                FROM old_rows o;
            ELSE  -- TRUNCATE: no rows to report, one event saying the table was emptied
                INSERT INTO relay.events (xid, app, repo, op)
                VALUES (pg_current_xact_id(), %8$L, %2$L, 't');
            END IF;
            -- A fresh snapshot (this is a new statement): see the listeners' flags now.
            IF FOUND AND EXISTS (SELECT 1 FROM relay.listeners WHERE sleeping) THEN
                PERFORM pg_notify('relay_events', '');
            END IF;
            RETURN NULL;
        END;
        $body$
    $f$, w.capture_function, w.repo, w.id_column, new_owner, new_account,
         old_owner, old_account, w.app);
    -- Executing the capture function is the trigger's business only.
    EXECUTE format('REVOKE ALL ON FUNCTION relay.%I() FROM PUBLIC', w.capture_function);
    RETURN w.capture_function;
END;
$$;

-- Remove relay's four capture triggers from a table (if there).
CREATE OR REPLACE FUNCTION relay.drop_capture_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    op text;
BEGIN
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'relay_capture_' || op, tbl);
    END LOOP;
END;
$$;

-- Start capturing changes of a table for an app. Idempotent: watching again
-- replaces the triggers (for instance with other columns). The repository
-- name is the table's name, unique within the app; its permission suffix
-- _OGE_ (default 740) sets who may read.
CREATE OR REPLACE FUNCTION relay.watch(
    tbl regclass,
    id_column text DEFAULT 'id',
    owner_column text DEFAULT NULL,
    account_column text DEFAULT NULL,
    app text DEFAULT 'default'
) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    tbl_name text;
    repo_mode text;
    fn text;
    col text;
BEGIN
    SELECT c.relname INTO tbl_name FROM pg_class c WHERE c.oid = tbl;
    IF NOT EXISTS (SELECT 1 FROM relay.apps a WHERE a.id = watch.app) THEN
        RAISE EXCEPTION 'no app named %', watch.app;
    END IF;
    IF EXISTS (SELECT 1 FROM relay.watched w
               WHERE w.app = watch.app AND w.repo = tbl_name AND w.table_oid <> tbl) THEN
        RAISE EXCEPTION 'another table named % is already watched for app %: repositories '
                        'are named by table name, so unwatch it first', tbl_name, watch.app;
    END IF;
    IF EXISTS (SELECT 1 FROM relay.watched w WHERE w.table_oid = tbl AND w.app <> watch.app) THEN
        RAISE EXCEPTION 'table % is watched for another app: unwatch it there first', tbl;
    END IF;
    -- The whole name must end in the suffix (no trailing newline or space).
    repo_mode := coalesce(substring(tbl_name from '_([0-7]{3})_$'), '740');
    FOREACH col IN ARRAY ARRAY[id_column, owner_column, account_column] LOOP
        CONTINUE WHEN col IS NULL;
        PERFORM 1 FROM pg_attribute
         WHERE attrelid = tbl AND attname = col AND attnum > 0 AND NOT attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'table % has no column %', tbl, col;
        END IF;
    END LOOP;
    -- Updates pair old and new rows by id, so the id must identify one row.
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_attribute a
          ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = tbl AND i.indisunique AND i.indnkeyatts = 1
          AND i.indpred IS NULL AND a.attname = id_column
    ) THEN
        RAISE EXCEPTION 'column % of % is not unique: the id column needs a primary key '
                        'or unique index of its own', id_column, tbl;
    END IF;
    fn := 'capture_' || tbl::oid;
    INSERT INTO relay.watched (app, repo, table_oid, id_column, owner_column, account_column,
                               mode, capture_function, id_attnum, owner_attnum, account_attnum)
    VALUES (watch.app, tbl_name, tbl, id_column, owner_column, account_column, repo_mode, fn,
            (SELECT attnum FROM pg_attribute WHERE attrelid = tbl AND attname = id_column),
            (SELECT attnum FROM pg_attribute WHERE attrelid = tbl AND attname = owner_column),
            (SELECT attnum FROM pg_attribute WHERE attrelid = tbl AND attname = account_column))
    ON CONFLICT ON CONSTRAINT watched_pkey DO UPDATE
       SET table_oid = EXCLUDED.table_oid, id_column = EXCLUDED.id_column,
           owner_column = EXCLUDED.owner_column, account_column = EXCLUDED.account_column,
           mode = EXCLUDED.mode, capture_function = EXCLUDED.capture_function,
           id_attnum = EXCLUDED.id_attnum, owner_attnum = EXCLUDED.owner_attnum,
           account_attnum = EXCLUDED.account_attnum;
    PERFORM relay.write_capture(tbl);

    PERFORM relay.drop_capture_triggers(tbl);
    EXECUTE format('CREATE TRIGGER relay_capture_insert AFTER INSERT ON %s
                    REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION relay.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER relay_capture_update AFTER UPDATE ON %s
                    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION relay.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER relay_capture_delete AFTER DELETE ON %s
                    REFERENCING OLD TABLE AS old_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION relay.%I()', tbl, fn);
    EXECUTE format('CREATE TRIGGER relay_capture_truncate AFTER TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION relay.%I()', tbl, fn);
    RETURN tbl_name;
END;
$$;

-- Stop capturing a table's changes: drop its triggers and capture function,
-- and nothing else (the table and its rows are untouched). Idempotent.
CREATE OR REPLACE FUNCTION relay.unwatch(tbl regclass) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fn text;
BEGIN
    DELETE FROM relay.watched WHERE table_oid = tbl RETURNING capture_function INTO fn;
    PERFORM relay.drop_capture_triggers(tbl);
    IF fn IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION IF EXISTS relay.%I()', fn);
    END IF;
    RETURN fn IS NOT NULL;
END;
$$;

-- Schema changes on watched tables (event triggers; they need a superuser
-- to create, so on a database where relay's role is not one they are left
-- out, with a notice, and these edges stay as before: see the README).
--
-- A watched table dropped, or a column relay reads (id, owner, account)
-- dropped: the repository is gone. Its registry row is removed and one 'x'
-- event goes into the log, in commit order, so every subscriber (and every
-- client resuming across that point) is told.
CREATE OR REPLACE FUNCTION relay.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w relay.watched%ROWTYPE;
BEGIN
    FOR w IN
        SELECT DISTINCT ON (wt.table_oid) wt.*
        FROM pg_event_trigger_dropped_objects() d
        JOIN relay.watched wt ON wt.table_oid = d.objid
        WHERE d.classid = 'pg_class'::regclass
          AND (d.objsubid = 0
               OR d.objsubid IN (wt.id_attnum, wt.owner_attnum, wt.account_attnum))
    LOOP
        DELETE FROM relay.watched WHERE table_oid = w.table_oid;
        INSERT INTO relay.events (xid, app, repo, op)
        VALUES (pg_current_xact_id(), w.app, w.repo, 'x');
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.table_oid) THEN
            -- Only a column went: the table stays, relay's triggers go.
            PERFORM relay.drop_capture_triggers(w.table_oid);
        END IF;
        EXECUTE format('DROP FUNCTION IF EXISTS relay.%I()', w.capture_function);
        IF EXISTS (SELECT 1 FROM relay.listeners WHERE sleeping) THEN
            PERFORM pg_notify('relay_events', '');
        END IF;
    END LOOP;
END;
$$;

-- ALTER TABLE on a watched table: a renamed id, owner or account column is
-- followed (by column number) and the capture function rewritten, so writes
-- keep working. A renamed table keeps its repository name: db-<old name>
-- goes on delivering, and clients need do nothing.
CREATE OR REPLACE FUNCTION relay.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w relay.watched%ROWTYPE;
    id_now text;
    owner_now text;
    account_now text;
BEGIN
    FOR w IN
        SELECT DISTINCT ON (wt.table_oid) wt.*
        FROM pg_event_trigger_ddl_commands() c
        JOIN relay.watched wt ON wt.table_oid = c.objid
        WHERE c.classid = 'pg_class'::regclass
    LOOP
        SELECT attname INTO id_now FROM pg_attribute
         WHERE attrelid = w.table_oid AND attnum = w.id_attnum AND NOT attisdropped;
        SELECT attname INTO owner_now FROM pg_attribute
         WHERE attrelid = w.table_oid AND attnum = w.owner_attnum AND NOT attisdropped;
        SELECT attname INTO account_now FROM pg_attribute
         WHERE attrelid = w.table_oid AND attnum = w.account_attnum AND NOT attisdropped;
        IF id_now IS DISTINCT FROM w.id_column OR owner_now IS DISTINCT FROM w.owner_column
           OR account_now IS DISTINCT FROM w.account_column THEN
            UPDATE relay.watched SET id_column = id_now, owner_column = owner_now,
                                     account_column = account_now
             WHERE table_oid = w.table_oid;
            PERFORM relay.write_capture(w.table_oid);
        END IF;
    END LOOP;
END;
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'relay_sql_drop') THEN
        CREATE EVENT TRIGGER relay_sql_drop ON sql_drop EXECUTE FUNCTION relay.on_sql_drop();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'relay_ddl_end') THEN
        CREATE EVENT TRIGGER relay_ddl_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION relay.on_ddl_end();
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'relay: not a superuser, so drops and renames on watched tables are not '
                 'followed (create the event triggers of sql/relay.sql as a superuser)';
END;
$$;

-- Only capture functions write the log (they run as the relay's role); no
-- other role reads or writes relay's tables unless a DBA grants it.
REVOKE ALL ON ALL TABLES IN SCHEMA relay FROM PUBLIC;

-- Bring every watched table's capture function to this release (no lock on
-- the tables: only the functions are replaced, the triggers stay).
SELECT relay.write_capture(w.table_oid)
FROM relay.watched w
WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = w.table_oid);
