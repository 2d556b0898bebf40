#!/usr/bin/env bash
# Mutation testing with mutmut (2.x): each module's mutants run only against
# the tests that cover it, in a scratch copy of the tree (the working tree is
# never modified, so tests and edits can go on meanwhile).
#
#   tools/mutation.sh                      # every module below
#   tools/mutation.sh permissions dbhub    # some of them
#   tools/mutation.sh --report             # scores from the last runs
#   tools/mutation.sh --show dbhub         # the surviving mutants of one module, as diffs
#
# Results stay in .mutation/<module>.cache (mutmut's sqlite cache), so a
# re-run only tests the mutants whose code or tests changed. Needs the test
# extra (pip install -e '.[test]'), redis-server and the embedded PostgreSQL
# the tests start themselves. Heavy: run it with the machine otherwise idle.
set -euo pipefail
# The whole script in one block, read before it runs: editing this file while
# a run goes on cannot derail that run.
{
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=${MUTMUT:-$ROOT/.venv/bin/mutmut}
OUT=$ROOT/.mutation

# module name -> "file to mutate|pytest arguments (the tests that cover it)[|scope]".
# A scope (optional) names the functions, classes or Class.methods to mutate;
# without one the whole file is mutated.
# Fast unit tests first (pytest -x stops at the first failure), then the
# functional tests that exercise the module; the slowest end-to-end tests
# (writers running for seconds, relay processes killed) are left out.
FILTER="tests/test_db_events.py::test_permission_suffixes tests/test_db_events.py::test_updates_and_deletes_reach_old_and_new_readers_live_and_on_resume"
RESUME="tests/test_durability.py::test_resume_gets_exactly_what_was_missed tests/test_durability.py::test_late_committer_is_not_skipped_on_resume tests/test_durability.py::test_resume_from_pruned_position_says_reload tests/test_durability.py::test_malformed_position_is_refused tests/test_durability.py::test_prune_by_size_keeps_the_newest_events tests/test_durability.py::test_resume_big_backlog_while_writes_continue tests/test_durability.py::test_resume_across_a_gap_in_tick_ids tests/test_durability.py::test_resume_on_another_relay_with_a_position_from_the_first tests/test_durability.py::test_the_oldest_kept_tick_is_a_valid_position_and_nothing_before_it"
DBEVENTS="tests/test_db_events.py::test_contract_example_tasks_760 tests/test_db_events.py::test_update_and_delete_frames tests/test_db_events.py::test_delete_reaches_exactly_the_old_readers tests/test_db_events.py::test_update_moving_account tests/test_db_events.py::test_reauth_as_another_user_follows_the_new_identity tests/test_db_events.py::test_root_token_receives_every_event tests/test_db_events.py::test_unwatched_table_is_refused_and_a_new_watch_is_joinable_at_once"
# listener.py: the tests of what the listener itself does (wake-ups, reconnects,
# big ticks through the cursor, positions), not every permission case.
E=tests/test_db_events.py
LISTEN="$E::test_contract_example_tasks_760 tests/test_views.py::test_snapshot_is_consistent_with_a_writer_committing_throughout $E::test_a_stream_of_commits_is_read_on_one_connection_and_each_counted_once $E::test_a_writer_that_saw_the_listener_awake_is_waited_for_before_it_sleeps tests/test_edges.py::test_a_listener_behind_retention_tells_its_subscribers_to_reload $E::test_a_sleeping_listener_whose_connection_dies_reconnects_at_once $E::test_a_listener_locked_out_says_so_then_delivers_and_counts_what_it_missed $E::test_update_and_delete_frames $E::test_update_moving_account $E::test_a_sleeping_listener_is_woken_by_the_writer $E::test_listener_connection_lost_in_the_middle_of_a_large_tick $E::test_rollback_produces_no_event $E::test_thousand_rows_in_one_transaction_arrive_in_order $E::test_row_written_right_after_joined_arrives $E::test_listener_survives_terminated_connection $E::test_one_statement_of_2500_rows_arrives_whole_and_in_order tests/test_durability.py::test_listener_terminated_mid_stream_loses_nothing tests/test_durability.py::test_resume_while_writers_keep_writing_has_no_gap_or_duplicate tests/test_durability.py::test_resume_across_a_gap_in_tick_ids tests/test_durability.py::test_events_carry_positions_and_joined_gives_one"
# dbhub.py: the permission filter (indexes, readers, audiences, dispatch) and the
# resume path (positions, held frames, replay_event, release_some); not its
# constants, nor snapshots, views and notices (the views' and edges' tests').
DBHUB_SCOPE="Held.hold Held.pop Position Event.pos Event.deleted_data RepoSubscribers.add RepoSubscribers.remove RepoSubscribers.readers RepoSubscribers.members DbHub.subscribe DbHub.unsubscribe DbHub.dispatch DbHub._send DbHub.replay_event DbHub.release_some audiences audience_of"
# listener.py: the loop (reconnects, the sleep handshake, draining, dispatch), not
# its constants, defaults and start/stop.
LISTENER_SCOPE="event_from_record Listener._run Listener._follow Listener._sleep Listener._drain Listener._dispatch"
VIEWS="tests/test_views.py tests/test_filters.py"
# dbhub.py's tests: units first, then the functional tests of the permission
# filter and of resumes (a truncate or a drop in a replay, filtered subscribers and
# snapshots where dispatch and replay_event branch for them); of the phones of
# test_dbjoin.py (pool and flow control: dbjoin's) only the one whose session
# ends mid-replay or mid-release (the position a paused channel resumes from).
DBHUB_TESTS="tests/test_dbhub.py tests/test_permissions.py $DBEVENTS $RESUME tests/test_edges.py::test_a_paused_session_resumes_each_db_channel_where_it_stopped tests/test_edges.py::test_truncate_reaches_subscribers_and_resumes_in_order tests/test_edges.py::test_a_resume_across_a_drop_of_its_table_says_so_and_stops_there tests/test_dbjoin.py::test_a_session_expiring_mid_resume_resumes_where_it_stopped tests/test_views.py::test_a_filtered_subscriber_outlives_the_last_plain_one tests/test_views.py::test_joining_again_without_the_filter_drops_it tests/test_views.py::test_a_filtered_resume_replays_through_the_filter tests/test_views.py::test_snapshot_is_consistent_with_a_writer_committing_throughout $FILTER"
# dbjoin.py: the resume path (join_db, the position check, the paged replay);
# the snapshot and filter parts (_snapshot, _view) are the views' tests' own.
# Its runner puts the quick functional tests first and the heavy replays last.
DBJOIN_SCOPE="JoinOptions join_db _check_position _replay"
V=tests/test_views.py
DBJOIN_TESTS="$E::test_unwatched_table_is_refused_and_a_new_watch_is_joinable_at_once $E::test_contract_example_tasks_760 $RESUME $V::test_a_filtered_resume_replays_through_the_filter $V::test_invalid_join_options_get_a_readable_error $V::test_snapshot_then_stream tests/test_expiry.py::test_session_expiring_during_a_db_join_is_not_subscribed tests/test_expiry.py::test_fresh_auth_after_expiry_rejoins_the_paused_channels tests/test_dbjoin.py"
# hub.py: the send path (queue caps, shared bodies, the budget's accounting, the
# flusher's writes, the writer task, flow control, closes) and the fan-out of
# chat messages; not the socket's constructor and properties, start, the
# shutdown helpers, nor the channel registry (join/leave: the broker's tests).
HUB_SCOPE="Socket.send Socket.send_shared Socket._admit Socket._enqueue Socket._mark Socket._account_out Socket._drop_queue Socket.flush Socket._write_some Socket._write_rest Socket.has_room Socket.wait_writable Socket.close Socket._cut_off Socket._lost Hub.deliver send_to"
# Its tests: the contract, limits (slow consumers), the broker; and the two that
# reach the rest of the send path: the process-wide send budget and a replay
# that stalls (wait_writable's deadline). Not the two limits tests that wait
# out timers outside the scope (heartbeats, the slow peer's drop: 10 s each),
# nor expiry's (sessions; 15 s): they cost every surviving mutant 35 s.
L=tests/test_limits.py
HUB_TESTS="tests/test_contract.py $L --deselect $L::test_peer_that_does_not_answer_pings_is_reaped --deselect $L::test_a_cut_off_peer_that_still_reads_nothing_is_dropped tests/test_broker.py tests/test_hostile.py::test_the_process_wide_send_budget_cuts_the_biggest_queues tests/test_dbjoin.py::test_a_resume_that_stops_reading_is_cut_off"
declare -A PLAN=(
  [permissions]="relay/permissions.py|tests/test_permissions.py tests/test_dbhub.py $FILTER"
  [dbhub]="relay/dbhub.py|$DBHUB_TESTS|$DBHUB_SCOPE"
  [dbjoin]="relay/dbjoin.py|$DBJOIN_TESTS|$DBJOIN_SCOPE"
  [views]="relay/views.py|tests/test_dbhub.py $VIEWS"
  [filters]="relay/filters.py|tests/test_filters.py"
  [listener]="relay/listener.py|$LISTEN|$LISTENER_SCOPE"
  [hub]="relay/hub.py|$HUB_TESTS|$HUB_SCOPE"
  [broker]="relay/broker|tests/test_broker.py"
)
ORDER=(permissions filters views dbhub dbjoin listener hub broker)

report() {
  for name in "${ORDER[@]}"; do
    [ -f "$OUT/$name.cache" ] || { echo "$name: not run"; continue; }
    IFS='|' read -r target _ scope <<<"${PLAN[$name]}"
    lines=""
    if [ -n "$scope" ]; then
      # shellcheck disable=SC2086
      lines=$("$PY" tools/mutation_scope.py "$target" $scope | "$PY" -c '
import re, sys
n = None
for line in sys.stdin:
    m = re.match(r"@@ -\S+ \+(\d+)", line)
    if m:
        n = int(m.group(1))
    elif n is not None and not line.startswith("-"):
        if line.startswith("+"):
            print(n)
        n += 1')
    fi
    "$PY" - "$OUT/$name.cache" "$name" "$scope" "$lines" <<'PY'
import sqlite3, sys
cache, name, scope, lines = sys.argv[1:]
wanted = {int(x) for x in lines.split()} if scope else None
db = sqlite3.connect(cache)
n: dict[str, int] = {}
for status, line in db.execute(
    "SELECT m.status, l.line_number FROM Mutant m JOIN Line l ON m.line = l.id"
):
    # mutmut numbers lines from 0, the patch from 1
    if wanted is None or line + 1 in wanted:
        n[status] = n.get(status, 0) + 1
total = sum(n.values())
# suspicious: killed, but slowly; timeout: the tests hung on the mutant (caught too)
killed = n.get("ok_killed", 0) + n.get("ok_suspicious", 0) + n.get("bad_timeout", 0)
survived = n.get("bad_survived", 0)
untested = n.get("untested", 0) + n.get("skipped", 0)
tested = total - untested
score = f"{100 * killed / tested:.1f}%" if tested else "-"
where = f" (scope: {scope})" if scope else ""
print(f"{name}: killed {killed}/{tested} ({score}), survived {survived},"
      f" untested {untested}{where}")
PY
  done
}

workdir() {  # a scratch copy of the tracked files, as they are now
  local dir=$OUT/work-$1
  rm -rf "$dir"
  mkdir -p "$dir"
  git ls-files -co --exclude-standard | grep -v '^\.mutation/' | tar -cf - -T - | tar -xf - -C "$dir"
  echo "$dir"
}

if [ "${1:-}" = "--report" ]; then report; exit 0; fi
if [ "${1:-}" = "--show" ]; then
  # In a copy of its own: never read a cache a running mutmut is writing.
  name=$2; dir=$(workdir "show-$name")
  cp "$OUT/$name.cache" "$dir/.mutmut-cache"
  cd "$dir"
  for id in $("$MUTMUT" result-ids survived); do
    echo "--- mutant $id"; "$MUTMUT" show "$id" | tail -n +2
  done
  cd "$ROOT" && rm -rf "$dir"
  exit 0
fi

mkdir -p "$OUT"
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  spec=${PLAN[$name]:?unknown module $name (one of ${ORDER[*]})}
  IFS='|' read -r target tests scope <<<"$spec"
  dir=$(workdir "$name")
  scope_args=()
  if [ -n "$scope" ]; then
    # shellcheck disable=SC2086
    "$PY" tools/mutation_scope.py "$target" $scope > "$dir/scope.patch"
    scope_args=(--use-patch-file scope.patch)
  fi
  [ -f "$OUT/$name.cache" ] && cp "$OUT/$name.cache" "$dir/.mutmut-cache"
  # The copy's relay/ comes first on sys.path, for pytest and for the relay
  # processes some tests start; no stale bytecode between mutants.
  runner="$PY -m pytest -x -q -p no:cacheprovider --timeout 120 $tests"
  echo "== $name: mutating $target; runner: $runner"
  (
    cd "$dir"
    export PYTHONPATH=$dir PYTHONDONTWRITEBYTECODE=1
    nice -n 10 "$MUTMUT" run --paths-to-mutate "$target" --tests-dir tests/ \
      --runner "$runner" --simple-output --no-progress -m 3 -b 20 "${scope_args[@]}" || true
  )
  cp "$dir/.mutmut-cache" "$OUT/$name.cache"
  rm -rf "$dir"
done
report
exit
}
