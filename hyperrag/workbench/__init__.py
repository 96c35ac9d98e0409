"""The serving layer: the workbench's operations (ask, prepare, gold batches), the request
batcher and uploads. Imports the engine layers below it; front doors (ui, bench, serve) call it."""
