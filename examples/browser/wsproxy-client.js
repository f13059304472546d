// The page's client: the package in clients/js (@wsproxy/client), one source
// of truth, re-exported here so that index.html imports "./wsproxy-client.js".
// Serve the repository's root (python3 -m http.server -b 127.0.0.1 8000) and
// open /examples/browser/, so that the browser can reach ../../clients/js/.
export * from "../../clients/js/src/index.js";
