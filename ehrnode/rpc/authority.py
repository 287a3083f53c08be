"""RPC routes for the proof-of-authority side of the chain: validator sets by height, the
history of set changes (what a verifier follows from genesis) and recorded evidence."""

from __future__ import annotations

import struct

from aiohttp import web

from ehrnode.core import authority, codec, state
from ehrnode.core.block import validator_set_hash
from ehrnode.rpc import params, views
from ehrnode.store.chain import Chain


class AuthorityApi:
    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/validators", self.get_validators)
        r.add_get("/v1/validators/changes", self.get_validator_changes)
        r.add_get("/v1/evidence", self.get_evidence)

    async def get_validators(self, req: web.Request) -> web.Response:
        """The set that voted on block ``height`` (default: the set voting on the next one)."""
        head = self.chain.head.height
        height = params.int_query(req, "height", head + 1, 1, head + 1)
        powers = (
            state.validators(self.chain.state)
            if height == head + 1
            else self.chain.validators_at(height)
        )
        return web.json_response(
            {
                "height": height,
                "hash": validator_set_hash(powers).hex(),
                "validators": [{"key": k.hex(), "power": p} for k, p in sorted(powers.items())],
            }
        )

    async def get_validator_changes(self, req: web.Request) -> web.Response:
        """Every validator set with the height it signs from (the genesis set from 1): what
        a verifier walks, header by header, to trust a later set (see ehrnode.client)."""
        changes = []
        cut = len(authority.P_FROM)
        for key, value in self.chain.state.scan(authority.P_FROM, limit=views.MAX_PAGE):
            powers = authority.decode_set(codec.decode(value))
            changes.append(
                {
                    "height": struct.unpack(">Q", key[cut:])[0],
                    "hash": validator_set_hash(powers).hex(),
                    "validators": [{"key": k.hex(), "power": p} for k, p in sorted(powers.items())],
                }
            )
        return web.json_response({"changes": changes})

    async def get_evidence(self, req: web.Request) -> web.Response:
        """Double votes recorded on chain."""
        out = []
        for key, value in self.chain.state.scan(authority.P_EVIDENCE, limit=views.MAX_PAGE):
            validator = key[len(authority.P_EVIDENCE) : len(authority.P_EVIDENCE) + 32]
            height, round_, vote_type = struct.unpack(">QIB", key[len(authority.P_EVIDENCE) + 32 :])
            entry = codec.decode(value)
            out.append(
                {
                    "validator": validator.hex(),
                    "height": height,
                    "round": round_,
                    "type": vote_type,
                    "recorded_at": entry["height"],
                    "reporter": entry["reporter"].hex(),
                }
            )
        return web.json_response({"evidence": out})
