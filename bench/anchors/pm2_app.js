'use strict';
// Anchor for bench/reload_under_load.py: the same trivial handler, as a plain
// app for `pm2 start pm2_app.js -i 2` (cluster mode) and `pm2 reload`.
const http = require('http');

http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain' });
  res.end(`ok pid=${process.pid}\n`);
}).listen(Number(process.env.PORT || 8000));
