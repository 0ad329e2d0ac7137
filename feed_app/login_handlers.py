"""Log-ins: logging in (an access token, and a refresh token in a cookie), refreshing, logging out
here or everywhere, changing the password. Each ended log-in is told to this process's
revocations at once, and reaches the others through the database (feed_app/revocations.py)."""

from __future__ import annotations

from feed_app import auth
from feed_app.handlers import PASSWORD_LENGTH, BaseHandler, Service
from feed_app.httpkit import ApiError, check_id
from feed_app.wire import REFRESH_COOKIE, REFRESH_PATH

# A cookie value longer than any refresh token is no refresh token: refused before it is hashed.
MAX_REFRESH_TOKEN = 64
# Why a refresh token did not refresh, by rotate_refresh_token()'s outcome (sql/007_logins.sql).
REFRESH_REFUSALS = {
    "unknown": "refresh token unknown or expired: log in",
    "ended": "this log-in has ended: log in",
    "reused": "refresh token used twice: this log-in has ended, log in again",
}


class LoginBase(BaseHandler):
    """What the handlers of log-ins share: the answer that grants an access token, and the
    refresh cookie."""

    def grant(self, user_id: int, login_id: int, refresh_token: str | None) -> None:
        """Answer with a new access token; with a refresh token, set its cookie too."""
        settings = self.service.settings
        ttl = settings.access_token_ttl
        if refresh_token is not None:
            self.set_cookie(
                REFRESH_COOKIE,
                refresh_token,
                path=REFRESH_PATH,
                max_age=settings.refresh_token_ttl,
                httponly=True,
                samesite="Strict",
                secure=self.request.protocol == "https",
            )
        token = auth.issue_token(user_id, settings.jwt_secret, ttl, login_id)
        self.finish({"token": token, "expires_in": ttl, "user_id": user_id})

    def forget_refresh_token(self) -> None:
        """Tell the browser to drop its refresh cookie (also on an error answer: Tornado's
        send_error keeps the cookies set before it)."""
        self.clear_cookie(REFRESH_COOKIE, path=REFRESH_PATH, httponly=True, samesite="Strict")

    async def password_matches(self, user_id: int, password: str) -> bool:
        """A guess at the user's password, counted and limited like every login attempt before
        any hash is computed."""
        limits = self.service.limits
        await limits.login_attempt(user_id, self.request.remote_ip)
        stored = await self.db.get_password_hash(user_id)
        return await limits.hashing.run(auth.verify_password_sync, password, stored)

    def ended(self, login_ids: list[int]) -> None:
        self.service.revocations.ended(login_ids)
        self.finish({"logins_ended": len(login_ids)})


class LoginHandler(LoginBase):
    async def post(self) -> None:
        body = self.json_body({"id": int, "password": str})
        user_id = check_id(body["id"], "id")
        if not await self.password_matches(user_id, body["password"]):
            raise ApiError(401, "wrong user id or password")
        refresh_token, refresh_hash = auth.new_refresh_token()
        ttl = self.service.settings.refresh_token_ttl
        login_id = await self.db.create_login(user_id, refresh_hash, ttl)
        self.grant(user_id, login_id, refresh_token)


class RefreshHandler(LoginBase):
    """The refresh cookie for a new access token and the next refresh token."""

    async def post(self) -> None:
        await self.service.limits.refresh(self.request.remote_ip)
        old = self.get_cookie(REFRESH_COOKIE)
        if not old or len(old) > MAX_REFRESH_TOKEN:
            raise ApiError(401, "no refresh token: log in")
        settings = self.service.settings
        new, new_hash = auth.new_refresh_token()
        outcome, user_id, login_id = await self.db.rotate_refresh_token(
            auth.refresh_token_hash(old),
            new_hash,
            settings.refresh_token_ttl,
            settings.refresh_grace,
        )
        if outcome == "rotated":
            self.grant(user_id, login_id, new)
        elif outcome == "grace":
            self.grant(user_id, login_id, None)  # the browser holds the newer token already
        else:
            if outcome == "reused":
                self.service.revocations.ended([login_id])
            self.forget_refresh_token()
            raise ApiError(401, REFRESH_REFUSALS[outcome])


class LogoutHandler(LoginBase):
    """End the caller's log-in (everywhere=False) or every log-in of the caller."""

    def initialize(self, service: Service, everywhere: bool) -> None:
        super().initialize(service)
        self.everywhere = everywhere

    async def post(self) -> None:
        caller = self.caller()
        only = None if self.everywhere else caller.login_id
        login_ids = await self.db.end_logins(caller.user_id, only=only)
        self.forget_refresh_token()
        self.ended(login_ids)


class PasswordHandler(LoginBase):
    """A new password, given the current one; every other log-in of the caller ends."""

    async def put(self) -> None:
        caller = self.caller()
        body = self.json_body({"old_password": str, "new_password": str})
        new_password = body["new_password"]
        if not PASSWORD_LENGTH[0] <= len(new_password) <= PASSWORD_LENGTH[1]:
            raise ApiError(400, "password must be {} to {} characters".format(*PASSWORD_LENGTH))
        if not await self.password_matches(caller.user_id, body["old_password"]):
            raise ApiError(403, "wrong password")
        new_hash = await self.service.limits.hashing.run(auth.hash_password_sync, new_password)
        self.ended(await self.db.change_password(caller.user_id, new_hash, caller.login_id))
