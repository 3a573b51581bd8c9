"""The adaptive-attack suite: what an attacker who knows the defense can try, and how it fares."""
