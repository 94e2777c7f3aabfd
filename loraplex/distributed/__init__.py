"""loraplex on Ray Serve: several replicas behind one OpenAI endpoint (`loraplex serve --replicas N`).

Imported only in cluster mode (`pip install 'loraplex[ray]'`); `loraplex serve` without --replicas never
imports Ray. See docs/scaling.md.
"""
