// Copy the web page's front-end libraries from node_modules (installed by `npm ci` from
// package-lock.json) into the Python package, with their licences, and write MANIFEST.json
// (package, version, licence, lock integrity, sha256 of every vendored file).
//
//   cd client/web && npm ci --ignore-scripts && node vendor.mjs     (or: make web-vendor)
//
// tests/test_web_vendor.py checks the vendored files against MANIFEST.json and the lock, so a
// hand edit of a vendored file, or a lock bump without re-vendoring, fails the tests.
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "src", "visloc_client", "web", "static", "vendor");

// What the page loads, per package. Every package also gets its LICENSE.
const FILES = {
  // UMD bundle; internmap (below) is bundled inside it.
  "d3-array": ["dist/d3-array.min.js"],
  "d3-geo": ["dist/d3-geo.min.js"],
  "topojson-client": ["dist/topojson-client.min.js"],
  // Natural Earth 1:110m countries (and land) as TopoJSON.
  "world-atlas": ["countries-110m.json"],
  // No file of its own: its code ships inside d3-array.min.js, so its licence comes along.
  internmap: [],
};

const lock = JSON.parse(readFileSync(join(here, "package-lock.json"), "utf8"));
const sha256 = (path) => createHash("sha256").update(readFileSync(path)).digest("hex");

rmSync(out, { recursive: true, force: true });
const manifest = {
  generated_by: "client/web/vendor.mjs from client/web/package-lock.json",
  packages: {},
};
for (const [name, files] of Object.entries(FILES)) {
  const locked = lock.packages[`node_modules/${name}`];
  if (!locked) throw new Error(`${name} is not in package-lock.json`);
  const src = join(here, "node_modules", name);
  const installed = JSON.parse(readFileSync(join(src, "package.json"), "utf8"));
  if (installed.version !== locked.version) {
    throw new Error(`${name}: node_modules has ${installed.version}, the lock ${locked.version}: run npm ci`);
  }
  const entry = { version: locked.version, license: locked.license, integrity: locked.integrity, files: {} };
  for (const file of [...files, "LICENSE"]) {
    const from = join(src, file);
    if (!existsSync(from)) throw new Error(`${name}: missing ${file}`);
    const base = file.split("/").pop();
    mkdirSync(join(out, name), { recursive: true });
    copyFileSync(from, join(out, name, base));
    entry.files[base] = sha256(from);
  }
  manifest.packages[name] = entry;
}
writeFileSync(join(out, "MANIFEST.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`vendored ${Object.keys(manifest.packages).length} packages into ${out}`);
