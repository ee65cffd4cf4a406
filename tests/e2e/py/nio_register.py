"""matrix-nio registers a user through the gate, syncs, then logs in.

Usage: nio_register.py GATE_URL USERNAME PASSWORD
Prints one JSON line: {"registered": user_id, "synced": bool, "logged_in": user_id}
Exits non-zero on any failure.
"""

import asyncio
import json
import sys

from nio import AsyncClient, LoginResponse, RegisterResponse, SyncResponse


async def main() -> int:
    url, username, password = sys.argv[1:4]
    client = AsyncClient(url, username)
    try:
        registered = await client.register(username, password, device_name="e2e")
        if not isinstance(registered, RegisterResponse):
            print(json.dumps({"error": f"register: {registered}"}))
            return 1
        synced = await client.sync(timeout=1000)
        if not isinstance(synced, SyncResponse):
            print(json.dumps({"error": f"sync: {synced}"}))
            return 1
        await client.logout()
        other = AsyncClient(url, registered.user_id)
        try:
            login = await other.login(password, device_name="e2e-login")
            if not isinstance(login, LoginResponse):
                print(json.dumps({"error": f"login: {login}"}))
                return 1
        finally:
            await other.close()
        print(json.dumps({
            "registered": registered.user_id,
            "synced": True,
            "logged_in": login.user_id,
        }))
        return 0
    finally:
        await client.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
