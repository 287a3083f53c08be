"""Reporting double votes: when the driver sees one validator sign two different votes for
one (height, round, type), this node puts the evidence on chain in an ``evidence``
transaction signed with its own key (a validator is a registered institution)."""

from __future__ import annotations

import logging

from ehrnode.admission import Admission
from ehrnode.core import state, tx
from ehrnode.core.block import Vote
from ehrnode.core.crypto import Identity
from ehrnode.core.errors import EhrError

log = logging.getLogger(__name__)


class EvidenceReporter:
    def __init__(self, identity: Identity, admission: Admission) -> None:
        self.identity = identity
        self.admission = admission

    def report(self, first: Vote, second: Vote) -> None:
        account = state.load(
            self.admission.mempool.check_state, state.P_ACCT + self.identity.public_key
        )
        if account is None:
            log.info("saw a double vote but this node's key is not registered to report it")
            return
        evidence = tx.make(
            self.identity,
            self.admission.chain.genesis.chain_id,
            "evidence",
            account["nonce"] + 1,
            {"a": first.to_wire(), "b": second.to_wire()},
        )
        try:
            self.admission.admit(evidence)
            log.warning(
                "reported validator %s for signing two votes at height %d round %d",
                first.validator.hex()[:16],
                first.height,
                first.round,
            )
        except EhrError as err:
            log.info("evidence not submitted: %s", err)
