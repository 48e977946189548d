#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# A rank that fails mid-step ends the whole job within the timeout, with the
# failing rank's error on stderr: never a hang (issue 16).
#   abort_test.sh MPIEXEC PROBE [mpiexec flags...]
set -u
mpiexec="$1" probe="$2"
shift 2
limit=60
for mode in throw exit hang; do
  start=$SECONDS
  out="$(timeout "$limit" "$mpiexec" -np 2 "$@" "$probe" "$mode" 2>&1)"
  rc=$?
  took=$((SECONDS - start))
  echo "== $mode: exit $rc after $took s"
  echo "$out" | tail -n 12
  if ((rc == 124)); then echo "FAIL: the job hung (killed after $limit s)"; exit 1; fi
  if ((rc == 0)); then echo "FAIL: the job reported success"; exit 1; fi
  if [[ "$mode" == throw && "$out" != *"rank 1 of 2: planted failure in step 2"* ]]; then
    echo "FAIL: the failing rank's error is not in the output"; exit 1
  fi
  if [[ "$mode" == hang && "$out" != *"mpi rank 0 of 2: all_reduce_sum has not finished after"* ]]; then
    echo "FAIL: the waiting rank's time-out message is not in the output"; exit 1
  fi
  if [[ "$mode" == hang ]] && ((rc != 75)); then
    echo "FAIL: exit $rc, not the time-out's 75 (Communicator::kTimeoutExit, passed on by mpiexec)"; exit 1
  fi
done
echo "every job ended with an error, none hung"
