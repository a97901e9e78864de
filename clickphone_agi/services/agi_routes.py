"""The FastAGI route table: one visible place that maps AGI scripts to services."""

from __future__ import annotations

import re
import uuid

import structlog

from clickphone_agi import dialplan_vars as dv
from clickphone_agi.adapters.agi import AgiRequest, AgiRouter, AgiSession
from clickphone_agi.domain.authorize import Decision
from clickphone_agi.ports import StorageUnavailable
from clickphone_agi.services.money import MoneyService

log = structlog.get_logger(__name__)

_UNIQUEID = re.compile(r"[\x21-\x7e]{1,150}")  # AST_MAX_UNIQUEID is 150


def build_router(money: MoneyService | None) -> AgiRouter:
    router = AgiRouter()

    async def authorize(request: AgiRequest, session: AgiSession) -> None:
        """``AGI(agi://127.0.0.1:4573/authorize,${ACCOUNT},${EXTEN},${SOURCE_IP})``."""
        args = [*request.args, "", "", ""]
        account = args[0] or request.env.get("accountcode", "")
        number = args[1] or request.env.get("extension", "")
        source_ip = args[2]
        call_id = request.env.get("uniqueid", "")
        if not _UNIQUEID.fullmatch(call_id):
            # Asterisk sends printable ASCII ("1795882904.9"); anything else came from another
            # client: it gets a decision, and its reservation an id of our own (it expires unused)
            if call_id:
                log.warning("agi.bad_uniqueid", uniqueid=repr(call_id[:40]))
            call_id = f"agi-{uuid.uuid4().hex}"
        if money is None:
            decision = Decision.deny(dv.Reason.NO_ROUTE)  # no tariffs configured: nothing is free
        else:
            try:
                decision = await money.authorize(account, number, source_ip, call_id)
            except StorageUnavailable as exc:
                # a full disk: no reservation can be kept, so no call is allowed (emergency numbers
                # never come here: the dialplan sends them on first); one line, not a traceback a call
                log.error("agi.authorize_unavailable", account=account, error=str(exc))
                decision = Decision.deny(dv.Reason.ERROR)
            except Exception:
                log.exception("agi.authorize_failed", account=account)
                decision = Decision.deny(dv.Reason.ERROR)
        await session.set_variable(dv.AUTH, dv.ALLOW if decision.allow else dv.DENY)
        await session.set_variable(dv.REASON, str(decision.reason) if decision.reason else "")
        await session.set_variable(dv.MAXSEC, str(decision.max_seconds))

    router.register(dv.AUTHORIZE_SCRIPT, authorize)
    return router
