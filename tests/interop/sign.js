// Signs JSON Web Tokens with jsonwebtoken (npm), and says what jsonwebtoken's
// own jwt.verify makes of each, for tests/test_jwt_interop.py.
//
//   NODE_PATH=.cache/jwt-interop/node_modules node tests/interop/sign.js < requests.json
//
// stdin: a JSON list of requests, each
//   {"alg": "HS256" | "RS256" | "ES256" | "EdDSA" | "none",
//    "secret": "..." or "key_file": "private.pem",   (what signs)
//    "payload": {...},                               (claims as given)
//    "options": {...},                               (jwt.sign's: expiresIn,
//                                                     notBefore, audience,
//                                                     issuer, keyid, ...)
//    "tamper": {...},                                (optional: claims changed
//                                                     after signing, signature kept)
//    "verify": {"secret": "..." or "key_file": "public.pem",
//               "options": {...}}}                   (jwt.verify's: algorithms,
//                                                     audience, issuer)
// stdout: a JSON list, in the same order, of
//   {"token": "...", "accepted": true | false, "error": "..." | null,
//    "verifier": "jsonwebtoken" | "node:crypto"}
//
// jsonwebtoken 9 has no EdDSA (its algorithms are HS*, RS*, PS*, ES* and
// none): EdDSA tokens are signed and verified here with Node's own crypto
// (Ed25519, RFC 8037), with the claim checks jwt.verify would make for the
// options this script is given (exp, nbf; audience and issuer are refused
// for EdDSA requests rather than half-implemented).
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const jwt = require("jsonwebtoken");

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

function keyOf(spec, kind) {
  if (spec.key_file) {
    const pem = fs.readFileSync(spec.key_file);
    return kind === "private" ? crypto.createPrivateKey(pem) : crypto.createPublicKey(pem);
  }
  return spec.secret;
}

// the payload part replaced by `changes` merged into the signed claims;
// header and signature kept: what an attacker editing a token does
function tamper(token, changes) {
  const [head, body, signature] = token.split(".");
  const claims = JSON.parse(Buffer.from(body, "base64url"));
  return [head, b64url(JSON.stringify({ ...claims, ...changes })), signature].join(".");
}

function signEdDSA(request) {
  const options = request.options || {};
  const now = Math.floor(Date.now() / 1000);
  const header = { alg: "EdDSA", typ: "JWT" };
  if (options.keyid) header.kid = options.keyid;
  const claims = { iat: now, ...request.payload };
  if (options.expiresIn !== undefined) claims.exp = now + options.expiresIn;
  if (options.notBefore !== undefined) claims.nbf = now + options.notBefore;
  const signed = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  const signature = crypto.sign(null, Buffer.from(signed), keyOf(request, "private"));
  return `${signed}.${b64url(signature)}`;
}

function verifyEdDSA(token, verify) {
  const options = verify.options || {};
  if (options.audience !== undefined || options.issuer !== undefined) {
    throw new Error("EdDSA requests: audience and issuer are not checked here");
  }
  const [head, body, signature] = token.split(".");
  const header = JSON.parse(Buffer.from(head, "base64url"));
  if (header.alg !== "EdDSA") throw new Error(`alg ${header.alg}`);
  const ok = crypto.verify(null, Buffer.from(`${head}.${body}`),
                           keyOf(verify, "public"), Buffer.from(signature, "base64url"));
  if (!ok) throw new Error("invalid signature");
  const claims = JSON.parse(Buffer.from(body, "base64url"));
  const now = Math.floor(Date.now() / 1000);
  const tolerance = options.clockTolerance || 0;
  if (claims.nbf !== undefined && claims.nbf > now + tolerance) throw new Error("jwt not active");
  if (claims.exp !== undefined && now >= claims.exp + tolerance) throw new Error("jwt expired");
}

function one(request) {
  let token;
  if (request.alg === "EdDSA") {
    token = signEdDSA(request);
  } else {
    const key = request.alg === "none" ? undefined : keyOf(request, "private");
    token = jwt.sign(request.payload, key, { ...request.options, algorithm: request.alg });
  }
  if (request.tamper) token = tamper(token, request.tamper);
  const verifier = request.alg === "EdDSA" ? "node:crypto" : "jsonwebtoken";
  try {
    if (request.alg === "EdDSA") {
      verifyEdDSA(token, request.verify);
    } else {
      jwt.verify(token, keyOf(request.verify, "public"), request.verify.options || {});
    }
    return { token, accepted: true, error: null, verifier };
  } catch (err) {
    return { token, accepted: false, error: `${err.name}: ${err.message}`, verifier };
  }
}

const input = fs.readFileSync(0, "utf8");
process.stdout.write(JSON.stringify(JSON.parse(input).map(one)) + "\n");
