"""The driver's side of a collective weight sync (`learner.sync_transport: collective`): one round.

A round starts both sides at once and only then waits: every learner rank's
`export_weights_collective` (rank 0 broadcasts, all take part in the gathers) and every chosen
rollout actor's `load_weights` with a `SyncTicket` (receive). Neither side can finish alone, so
neither is waited on before the other is started; the driver touches no tensor.

The group is made afresh (a new generation, `open_rendezvous`) whenever its members change: the
learner group, the set of actors (a re-sync of one revived actor is a group of two), or an actor
handle; and after any failed round. An actor that Ray restarted therefore never meets a group its
predecessor was in: it joins the next generation, with everyone else.

A failed round: an actor that died, or did not answer within `recovery.sync_timeout_s` (hung, or
waiting on a hung peer: they cannot be told apart from here, so both are restarted), is revived
by the pool and the round runs again once, on a new group; rank 0 stops broadcasting at the
first error and leaves the group, so the other receivers fail at once instead of at the timeout.
A learner that died is the learners' failure (`RoleFailure("learner")`, the trainer's recovery).
An error raised by a live actor's code (a weight that does not fit) is a bug and propagates.
"""

from __future__ import annotations

from typing import Any, Callable

from services.backends.remote import wait_all
from services.contracts import RoleFailure
from services.learner.collective import CollectiveWeights, SyncTicket, open_rendezvous


class CollectiveRounds:
    """The current sync group of one rollout pool and the rounds run on it."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._group: tuple | None = None  # (members' identity, Rendezvous, each member's first rank, store)

    def forget(self) -> None:
        """The next round makes a new group (an actor was restarted or replaced)."""
        self._group = None

    def run(self, weights: CollectiveWeights, actors: list, members: list[int], version: int,
            restart: Callable[[int], None]) -> list[dict]:
        """Sync `members` (indexes into `actors`) from the learners; per member its load stats. A
        member that fails is restarted (`restart(i)`) and the round runs again, once."""
        for attempt in range(2):
            rdv, ranks = self._rendezvous(weights, actors, members)
            sends = weights.start_send(rdv)
            recvs = [actors[a].load_weights.remote(version, SyncTicket(rdv, r)) for a, r in zip(members, ranks)]
            results, failed = self._await(sends, recvs, members, weights)
            if not failed:
                return results
            self._group = None
            if attempt:
                raise RoleFailure("rollout", f"rollout actors {failed} failed the collective weight sync twice")
            for a in failed:
                restart(a)
        raise AssertionError("unreachable")

    def _rendezvous(self, weights: CollectiveWeights, actors: list, members: list[int]):
        import ray

        key = (id(weights.source), tuple(members), tuple(id(actors[a]) for a in members))
        if self._group is None or self._group[0] != key:
            info = wait_all([actors[a].ready.remote() for a in members], self.timeout_s, "rollout",
                            "rollout actors: their weight-sync ranks")
            ranks, nxt = [], 1  # learner rank 0 is rank 0
            for i in info:
                ranks.append(nxt)
                nxt += int(i.get("sync_ranks", 1))
            rdv, store = open_rendezvous(weights.manifest["backend"], nxt, self.timeout_s, ray.util.get_node_ip_address())
            self._group = (key, rdv, ranks, store)
        return self._group[1], self._group[2]

    def _await(self, sends: list, recvs: list, members: list[int], weights: CollectiveWeights):
        """Both sides' outcome: (each member's stats, the members that died or never answered)."""
        import ray

        everything = sends + recvs
        ray.wait(everything, num_returns=len(everything), timeout=self.timeout_s, fetch_local=False)
        done, _ = ray.wait(recvs, num_returns=len(recvs), timeout=0, fetch_local=False)
        ready = set(done)
        results: list[Any] = [None] * len(recvs)
        failed, errors = [], []
        for i, ref in enumerate(recvs):
            if ref not in ready:
                failed.append(members[i])
                continue
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayActorError:
                failed.append(members[i])
            except ray.exceptions.RayTaskError as exc:  # a live receiver's own error, or a broken group
                errors.append(exc)
        # the learners end soon after the receivers: rank 0's broadcast fails, or times out, at the latest
        manifest = wait_all(sends, 2 * self.timeout_s, "learner", "learners: broadcasting the weights")[0]
        if failed:
            return results, failed
        if errors:
            raise errors[0].as_instanceof_cause() from None
        if "error" in manifest:
            raise RuntimeError(f"learner rank 0 could not broadcast the weights: {manifest['error']}")
        weights.manifest.update(manifest)
        return results, []
