"""``fcnseg serve``: a local web page and HTTP API over a checkpoint (extra ``[serve]``: Starlette, uvicorn).

`predictor` reads uploads through fcnseg's reader and predicts them one at a time; `app` is the
Starlette app (the page in ``static/index.html``, ``/api/info``, ``/api/predict``); `server` runs it
with uvicorn. Nothing here is imported by ``import fcnseg``: the web libraries load only when served.
"""
