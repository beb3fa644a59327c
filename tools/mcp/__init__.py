"""Any MCP server's tools as streamagent tools: ``streamagent tool mcp --server NAME``.

``config`` reads the servers file, ``connection`` keeps the MCP client session, ``tool`` makes each
exposed MCP tool a ``Tool`` of the SDK (so every command goes through the same signature, approval,
ledger, retry and dead-letter path), ``calls`` records started calls (at most once), ``runner``
runs them. See docs/guides/mcp.md.
"""
