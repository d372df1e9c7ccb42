// Node.js (libuv, epoll): `node node_http.js serve ADDR PORT` answers every
// request with "hello from node <url>"; `node node_http.js get URL` prints
// the body it receives.
const http = require('http');
const [mode, a, b] = process.argv.slice(2);
if (mode === 'serve') {
  http.createServer((req, res) => res.end('hello from node ' + req.url)).listen(Number(b), a);
} else {
  http.get(a, (res) => {
    let body = '';
    res.on('data', (chunk) => (body += chunk));
    res.on('end', () => console.log(body));
  });
}
