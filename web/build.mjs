// Builds the web app into dist/: one script (uPlot bundled in), one stylesheet, the page. The
// gateway embeds dist/ when it is compiled (ingest-gateway/src/web.rs).
import * as esbuild from 'esbuild';
import { copyFile, mkdir, rm } from 'node:fs/promises';

await rm('dist', { recursive: true, force: true });
await mkdir('dist', { recursive: true });
await esbuild.build({
  entryPoints: ['src/app.js'],
  bundle: true,
  minify: true,
  format: 'esm',
  target: ['chrome110', 'firefox115', 'safari16'],
  outfile: 'dist/app.js',
  legalComments: 'eof',
  logLevel: 'warning',
});
await copyFile('src/index.html', 'dist/index.html');
console.log('built web/dist');
