'use strict';
// A plain Node `http` server under `deployer master` (no framework), for the
// recipe test (tests/test_recipes.py): `node server.js` with `ready = "pipe"`.
const fs = require('fs');
const http = require('http');
const net = require('net');
const path = require('path');

const release = path.basename(process.env.DEPLOYER_RELEASE || process.cwd());
let draining = false;

const server = http.createServer((req, res) => {
  // Draining: the connection's last response, and the client is told so.
  if (draining) res.setHeader('Connection', 'close');
  res.end(`ok pid=${process.pid} release=${release}\n`);
});

// fd 3: the socket the master shares (LISTEN_FDS=1). Ready once listening.
server.listen({ fd: 3 }, () => {
  fs.writeSync(Number(process.env.DEPLOYER_READY_FD), 'READY=1\n');
});

// Drain on SIGTERM. Not `server.close()`: since Node 19 it also closes idle
// keep-alive connections at once, while a client may be sending its next
// request on one (a failed request). net.Server's close only stops accepting;
// open connections end after their next response (Connection: close) or at
// their keep-alive timeout, and then the callback exits.
process.on('SIGTERM', () => {
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
});
