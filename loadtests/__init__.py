"""Load tests for Quiver (or any OpenAI-compatible endpoint): Locust scenarios, load shapes,
the headless runner behind `quiver loadtest`, its SLO check and HTML report.

Only `locustfile.py` and `users.py` import Locust (which monkey-patches the process with
gevent); everything else here is plain Python, safe to import anywhere.
"""
