"""The example workflows' generator, by job (scripts/make_workflows.py is its command line).

* ``node_types``: each node type's sockets and widgets, read from the node's own schema (``node_schemas.json``,
  a snapshot of ComfyUI's ``/object_info``), plus what only the frontend knows (minimum sizes, frontend-only nodes);
* ``graph``: the :class:`~workflow_gen.graph.Workflow` builder (nodes, links, ordering, initial view);
* ``ui_format`` / ``api_format``: the two files ComfyUI reads, rendered from one graph;
* ``content``: prompts, model file names and commands the workflows share;
* ``layout``: the column positions and the pieces several workflows reuse;
* one module per kind of workflow: ``text_to_image``, ``comparison``, ``scoring``, ``training``.

Standard library only: the generator and tests/test_workflows.py run without ComfyUI.
"""
