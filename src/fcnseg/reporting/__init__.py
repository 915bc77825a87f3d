"""``fcnseg report``: a training run as one self-contained HTML page.

`run_folder` reads what ``fcnseg train`` wrote, `per_image` evaluates the checkpoint image by image,
`page` renders the HTML (figures embedded, nothing fetched), `report` ties them together
(`write_run_report`).
"""
